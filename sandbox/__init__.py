"""A fake Bouncer batch API: a real HTTP server for tests, benchmarks and local runs.

Run it with `python -m sandbox --api-key KEY`; embed it with
`sandbox.app.create_app(SandboxConfig(...))`. It shares no code with the client.
"""
