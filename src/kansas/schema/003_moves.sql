-- kansas schema version 3: moves of realms and users between shards.

-- One row per move. While a realm has a 'running' move, every kansas re-reads the
-- mappings of that realm's queues from Redis on each request (so a queue invalidated
-- by the move is answered BAD_EVENT_QUEUE_ID at once, by every kansas process).
-- Which queues have been invalidated lives in Redis, with the mappings themselves
-- ("invalid":true): that is what makes a move resumable and never invalidate twice;
-- `invalidated` here is the progress shown to operators.
CREATE TABLE kansas_moves (
    id          bigserial PRIMARY KEY,
    realm       text NOT NULL,
    user_id     bigint,                 -- NULL: the whole realm
    to_shard    text NOT NULL,
    reload_rate double precision NOT NULL CHECK (reload_rate > 0),
    state       text NOT NULL DEFAULT 'running'
                CHECK (state IN ('running', 'done', 'interrupted')),
    invalidated integer NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE INDEX kansas_moves_running ON kansas_moves (realm) WHERE state = 'running';

-- Only what changes the snapshot (a move starting or ending) is announced; progress
-- updates are not.
CREATE TRIGGER kansas_moves_changed AFTER INSERT OR DELETE OR UPDATE OF state
    ON kansas_moves FOR EACH STATEMENT EXECUTE FUNCTION kansas_notify_assignment();

-- A drained shard takes no new queues (weight 0); the weight it had is kept here so
-- that `kansas-ctl shard undrain` can give it back. NULL: not drained.
ALTER TABLE kansas_shards ADD COLUMN drained_weight integer CHECK (drained_weight >= 0);
