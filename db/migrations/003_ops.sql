-- Operations: API usage per minute across all workers (rate-limit utilization) and alert state
-- (an alert raises one event per crossing and one when it clears).

create table api_usage (
    minute   timestamptz not null,
    budget   text        not null,  -- create | other
    requests bigint      not null default 0,
    primary key (minute, budget)
);

create table alert_state (
    name       text primary key,  -- backlog, failed, rate_limit_create, rate_limit_other, credits
    firing     boolean          not null,
    value      double precision,
    threshold  double precision,
    changed_at timestamptz      not null default now(),  -- when it last raised or cleared
    observed_at timestamptz     not null default now()   -- when `value` was last read
);
