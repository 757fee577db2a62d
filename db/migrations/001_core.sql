-- Core tables. Postgres is the system of record for rows; Temporal carries ids and counts.
-- No foreign keys on the bulk tables: COPY of millions of rows must not pay a trigger per row.

create table user_batches (
    id            bigserial primary key,
    user_id       text        not null,
    name          text        not null default '',
    priority      smallint    not null default 2,            -- 0 critical, 1 high, 2 normal, 3 low
    lanes         text[]      not null default '{deliverability}',
    state         text        not null default 'receiving',  -- receiving, preparing, queued, paused, completed, cancelled, failed
    source        text        not null default '',
    workflow_id   text        unique,
    rows_total    bigint      not null default 0,
    invalid       bigint      not null default 0,
    duplicates    bigint      not null default 0,
    summary       jsonb,
    created_at    timestamptz not null default now(),
    finished_at   timestamptz
);
create index user_batches_user on user_batches (user_id, id);
create index user_batches_active on user_batches (state) where state in ('queued', 'paused', 'preparing');

-- One row per input row; `email` is the normalized address, null when the row is invalid.
create table items (
    user_batch_id bigint not null,
    row_no        bigint not null,   -- line number in the submitted file (1-based)
    raw           text   not null,
    email         text,
    state         text   not null,   -- pending, invalid, duplicate, verified, cancelled, failed
    reason        text,
    primary key (user_batch_id, row_no)
);

-- The dedupe registry: one row per unique normalized address. Bouncer's `name` carries the id.
create table addresses (
    id    bigserial primary key,
    email text not null unique
);

-- Per user batch and lane: what it needs and its own queue cursor (rows seq >= cursor are unclaimed).
create table user_batch_lanes (
    user_batch_id    bigint not null,
    lane             text   not null,
    unique_addresses bigint not null default 0,
    cached           bigint not null default 0,   -- fresh results reused, no credit spent
    shared           bigint not null default 0,   -- already queued by another user batch
    enqueued         bigint not null default 0,   -- put on this batch's own queue
    remaining        bigint not null default 0,   -- addresses still without a result or dead letter
    failed           bigint not null default 0,
    dispatched       bigint not null default 0,   -- addresses packed from this batch (fair share)
    cursor           bigint not null default 0,
    next_seq         bigint not null default 0,
    primary key (user_batch_id, lane)
);

-- Pending addresses, at most one row per (lane, address): the pay-once guard across user batches.
create table queue (
    user_batch_id bigint   not null,
    lane          text     not null,
    seq           bigint   not null,
    address_id    bigint   not null,
    attempts      smallint not null default 0,
    primary key (user_batch_id, lane, seq)
);
create unique index queue_lane_address on queue (lane, address_id);

-- A user batch waiting on an address another user batch has queued.
create table waits (
    lane          text   not null,
    address_id    bigint not null,
    user_batch_id bigint not null,
    primary key (lane, address_id, user_batch_id)
);
create index waits_user_batch on waits (user_batch_id);

create table bouncer_batches (
    id                bigserial primary key,
    lane              text        not null,
    pack_key          text collate "C" not null unique,  -- `<scheduler key>:<n>`; C order for range lookups
    state             text        not null default 'packed',  -- packed, submitting, submitted, stored, failed
    size              int         not null,
    sent              int,
    provider_batch_id text,
    callback_token    text        not null,
    create_attempts   int         not null default 0,
    ambiguous_creates int         not null default 0,
    last_error        text,
    touched           text[],      -- workflow ids of user batches notified on store
    created_at        timestamptz not null default now(),
    submitted_at      timestamptz,
    completed_at      timestamptz,
    stored_at         timestamptz
);
create index bouncer_batches_open on bouncer_batches (lane) where state in ('packed', 'submitting', 'submitted');

-- A Bouncer batch claims ranges of user batches' queues, not rows.
create table bouncer_batch_parts (
    bouncer_batch_id bigint not null,
    user_batch_id    bigint not null,
    seq_from         bigint not null,
    seq_to           bigint not null,  -- exclusive
    addresses        int    not null,  -- rows claimed in the range (seq numbers may have gaps)
    primary key (bouncer_batch_id, user_batch_id, seq_from)
);

-- One row per pack call: how long packing took (the scheduler's critical path).
create table pack_runs (
    id            bigserial primary key,
    lane          text        not null,
    pack_key      text        not null,
    batches       int         not null,
    addresses     int         not null,
    queue_drained bool        not null,
    queued_after  bigint      not null,
    duration_ms   real        not null,
    created_at    timestamptz not null default now()
);
create index pack_runs_key on pack_runs (pack_key);

create table results (
    address_id  bigint      not null,
    lane        text        not null,
    status      text        not null,
    reason      text,
    score       smallint,
    accept_all  text,
    record      jsonb       not null,
    verified_at timestamptz not null default now(),
    primary key (address_id, lane)
);

create table dead_letters (
    id               bigserial primary key,
    lane             text        not null,
    address_id       bigint      not null,
    bouncer_batch_id bigint,
    reason           text        not null,
    attempts         int         not null,
    created_at       timestamptz not null default now()
);
create index dead_letters_address on dead_letters (lane, address_id);

create table events (
    id         bigserial primary key,
    kind       text        not null,
    subject    text        not null default '',
    data       jsonb       not null default '{}',
    created_at timestamptz not null default now()
);

-- One outcome per input row. `pending` rows take their verdict from `results` once it exists.
create view item_outcomes as
select i.user_batch_id, i.row_no, i.raw, i.email,
       case when i.state = 'pending' and r.status is not null then 'verified' else i.state end as state,
       i.reason as note,  -- why invalid, duplicate of which line, cancelled, failed
       r.status, r.reason, r.score, r.accept_all, r.verified_at, r.record
from items i
join user_batches b on b.id = i.user_batch_id
left join addresses a on a.email = i.email and i.state in ('pending', 'duplicate')
left join results r on r.address_id = a.id and r.lane = b.lanes[1];
