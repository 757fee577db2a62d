-- Catch-all lane results on every item, events to subscribers, per-user in-flight caps.

-- ---- catch-all lane ------------------------------------------------------------------------
-- The deliverability verdict as before, plus the catch-all lane's verdict when the user batch
-- asked for that lane (columns appended: CREATE OR REPLACE VIEW keeps the existing ones).
create or replace view item_outcomes as
select i.user_batch_id, i.row_no, i.raw, i.email,
       case when i.state = 'pending' and r.status is not null then 'verified' else i.state end as state,
       i.reason as note,
       r.status, r.reason, r.score, r.accept_all, r.verified_at, r.record,
       c.status as catchall_status, c.reason as catchall_reason, c.score as catchall_score,
       c.verified_at as catchall_verified_at
from items i
join user_batches b on b.id = i.user_batch_id
left join addresses a on a.email = i.email and i.state in ('pending', 'duplicate')
left join results r on r.address_id = a.id and r.lane = b.lanes[1]
left join results c on c.address_id = a.id and c.lane = 'catchall' and 'catchall' = any(b.lanes);

-- ---- events to subscribers -----------------------------------------------------------------
-- `events.kind` is the topic (e.g. user_batch.completed, alert.queue_depth). Every row is
-- delivered to the subscriptions whose topic matches, whoever wrote it.
alter table events add column user_batch_id bigint;
alter table events add column user_id text;
alter table user_batches add column progress_event_pct smallint not null default 0;
alter table user_batches add column progress_event_at timestamptz;
alter table user_batches add column progress_event_done bigint not null default 0;

create table subscriptions (
    id         bigserial primary key,
    topic      text        not null,   -- exact topic, `prefix.*`, or `*`
    url        text        not null,
    secret     text        not null,   -- HMAC key; stays here, never in Temporal
    user_id    text,                   -- null: every user's events (and events of no user)
    created_at timestamptz not null default now()
);

create sequence delivery_ready_seq;

-- One row per (event, subscription). `ready_seq` grows each time a delivery becomes pending
-- (created, or retried by an operator): the dispatcher reads pending rows past its cursor.
create table deliveries (
    id              bigserial primary key,
    event_id        bigint      not null,
    subscription_id bigint      not null,
    state           text        not null default 'pending',  -- pending, delivered, dead
    attempts        int         not null default 0,
    last_status     int,
    last_error      text,
    ready_seq       bigint      not null default nextval('delivery_ready_seq'),
    created_at      timestamptz not null default now(),
    delivered_at    timestamptz,
    unique (event_id, subscription_id)
);
create index deliveries_pending on deliveries (ready_seq) where state = 'pending';

-- Events not yet given their delivery rows (a flag, not an id cursor: ids commit out of order).
alter table events add column fanned_out bool not null default false;
create index events_unfanned on events (id) where not fanned_out;

-- ---- per-user caps -------------------------------------------------------------------------
-- Overrides MAX_IN_FLIGHT_PER_USER for one user (0: no cap for this user).
create table user_limits (
    user_id       text primary key,
    max_in_flight bigint not null check (max_in_flight >= 0)
);
