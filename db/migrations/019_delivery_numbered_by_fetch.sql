-- A delivery made pending again (`events retry`) waits with no `ready_seq` until the dispatcher's
-- fetch numbers it. Numbers taken outside the fetch commit in another order than they are taken:
-- a fetch that read a later number moved its cursor past an earlier one still uncommitted, and
-- that delivery stayed pending, never fetched. The fetch numbers and reads under one advisory
-- lock, so every number it reads past was committed before it read. The default stays for the
-- rows the fetch's fan-out inserts.
alter table deliveries alter column ready_seq drop not null;
