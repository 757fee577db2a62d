-- `lane.paused` and `credits.exhausted` are recorded by an activity; a retry after its commit
-- must not record (and deliver) the event twice. Their `subject` names the activity execution
-- (lane, workflow run, activity id), unique here; older rows have an empty subject.
create unique index events_lane_once on events (kind, subject)
    where kind in ('lane.paused', 'credits.exhausted') and subject <> '';
