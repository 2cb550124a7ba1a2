-- kansas schema version 1: shards, realm pins, user overrides, and change notification.

CREATE TABLE kansas_shards (
    name       text PRIMARY KEY,
    url        text NOT NULL,
    weight     integer NOT NULL DEFAULT 100 CHECK (weight >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE kansas_realm_pins (
    realm      text PRIMARY KEY,
    shard      text NOT NULL REFERENCES kansas_shards (name),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE kansas_user_overrides (
    realm      text NOT NULL,
    user_id    bigint NOT NULL,
    shard      text NOT NULL REFERENCES kansas_shards (name),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (realm, user_id)
);

-- Every kansas LISTENs on this channel and reloads its snapshot when told; the payload
-- names the table only (NOTIFY payloads are small, and a reload is cheap).
CREATE FUNCTION kansas_notify_assignment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kansas_assignment', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER kansas_shards_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON kansas_shards FOR EACH STATEMENT EXECUTE FUNCTION kansas_notify_assignment();
CREATE TRIGGER kansas_realm_pins_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON kansas_realm_pins FOR EACH STATEMENT EXECUTE FUNCTION kansas_notify_assignment();
CREATE TRIGGER kansas_user_overrides_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON kansas_user_overrides FOR EACH STATEMENT EXECUTE FUNCTION kansas_notify_assignment();
