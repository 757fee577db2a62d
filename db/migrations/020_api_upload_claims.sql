-- API_SUBMISSIONS_PER_HOUR: an upload takes its place in its user's hour before its body is read,
-- as a claim committed at once; the transaction that stores its batch deletes the claim, and so
-- does a refused or broken upload. Claims and the user's batches are counted under a per-user
-- advisory lock, so uploads that arrive together cannot all pass the count.
create table api_upload_claims (
    id              bigserial   primary key,
    user_id         text        not null,
    idempotency_key text,
    claimed_at      timestamptz not null default now()
);
create index api_upload_claims_user on api_upload_claims (user_id, claimed_at);
