-- HTTP API keys, recurring lists and cleanup support (issue 6, parts 3-5).

-- API keys: only a SHA-256 of the key is stored (keys are 256-bit random, so a fast hash is
-- enough: nothing to brute-force). `prefix` lets an operator tell keys apart in `apikeys list`.
create table api_keys (
    id           bigserial primary key,
    user_id      text        not null,
    prefix       text        not null,
    key_hash     bytea       not null unique,
    admin        bool        not null default false,   -- may pause/resume lanes
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz
);
create index api_keys_user on api_keys (user_id);

-- A list re-verified by a Temporal Schedule (`submit --every`). Each run copies the items of
-- `latest_user_batch_id` into a new user batch and becomes the latest; cleanup keeps the latest.
create table recurring_lists (
    schedule_id          text primary key,
    user_id              text        not null,
    source_user_batch_id bigint      not null,
    latest_user_batch_id bigint      not null,
    every_s              bigint      not null,
    runs                 int         not null default 0,
    created_at           timestamptz not null default now()
);
create index recurring_lists_latest on recurring_lists (latest_user_batch_id);

-- Cleanup deletes results by age in bounded chunks; without this each chunk scans the table.
create index results_verified_at on results (verified_at);
-- Cleanup finds finished user batches by age.
create index user_batches_finished on user_batches (finished_at) where finished_at is not null;
-- Events are deleted by age, oldest first.
create index events_created_at on events (created_at);
-- Cleanup keeps a finished user batch while a Bouncer batch holding its addresses is open.
create index bouncer_batch_parts_user_batch on bouncer_batch_parts (user_batch_id);
