-- `POST /v1/batches` with an `Idempotency-Key` header: a retry of a submission whose answer was
-- lost returns the batch the first request created instead of storing the list twice.
alter table user_batches add column idempotency_key text;
create unique index user_batches_idempotency on user_batches (user_id, idempotency_key)
    where idempotency_key is not null;
