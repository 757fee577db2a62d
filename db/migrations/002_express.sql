-- Express slots (issue 3): a Bouncer batch formed of small lists only, counted apart from the
-- lane's regular slots. A fresh scheduler adopting unfinished batches needs to know which.
alter table bouncer_batches add column express boolean not null default false;
