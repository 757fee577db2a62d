-- Standby batches: packed (and their request bodies built) while every slot of the lane is busy,
-- each waiting for one in-flight batch (`after_id`) to leave the API, then sent at once.
alter table bouncer_batches add column after_id bigint;

-- A lane paused by its scheduler (operator pause, out of credits): standby batches hold while a
-- row is here (the scheduler writes and deletes it; `pg_notify('bouncer_slots', ...)` wakes them).
create table lane_holds (
    lane   text        primary key,
    reason text        not null,
    since  timestamptz not null default now()
);
