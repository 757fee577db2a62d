-- When the callback receiver accepted Bouncer's completion callback for the batch (null: none
-- came, e.g. its completion was found by a status poll). A lane whose latest completion came by
-- callback polls sparsely as the fallback (see BouncerBatchWorkflow); one whose callbacks are
-- lost (receiver down, wrong CALLBACK_PUBLIC_URL) keeps polling every POLL_INTERVAL_S.
alter table bouncer_batches add column callback_at timestamptz;
