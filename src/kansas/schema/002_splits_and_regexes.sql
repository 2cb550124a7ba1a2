-- kansas schema version 2: realms split across shards by user id, and regex rules --
-- what Zulip's sharding.json can say beyond one realm -> one shard.

-- A split realm: its user goes to the shard at position (user_id % n) of its list.
-- A realm has a pin or a split, not both (the authority removes one when setting the
-- other).
CREATE TABLE kansas_realm_splits (
    realm      text NOT NULL,
    position   integer NOT NULL CHECK (position >= 0),
    shard      text NOT NULL REFERENCES kansas_shards (name),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (realm, position)
);

-- Regex rules, tried in priority order (lowest first) on realms without a pin or split,
-- with Python's re.match, case-insensitive, as Zulip matches its shard_regexes. Each
-- names one shard or a split (its shards, by position).
CREATE TABLE kansas_regex_rules (
    pattern    text PRIMARY KEY,
    priority   integer NOT NULL UNIQUE,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE kansas_regex_rule_shards (
    pattern    text NOT NULL REFERENCES kansas_regex_rules (pattern) ON DELETE CASCADE,
    position   integer NOT NULL CHECK (position >= 0),
    shard      text NOT NULL REFERENCES kansas_shards (name),
    PRIMARY KEY (pattern, position)
);

CREATE TRIGGER kansas_realm_splits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON kansas_realm_splits FOR EACH STATEMENT EXECUTE FUNCTION kansas_notify_assignment();
CREATE TRIGGER kansas_regex_rules_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON kansas_regex_rules FOR EACH STATEMENT EXECUTE FUNCTION kansas_notify_assignment();
CREATE TRIGGER kansas_regex_rule_shards_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON kansas_regex_rule_shards FOR EACH STATEMENT EXECUTE FUNCTION kansas_notify_assignment();
