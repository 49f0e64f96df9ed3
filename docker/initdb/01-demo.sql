-- Demo schema for the docker compose setup. The postgres image runs this once,
-- as the superuser `postgres`, in the database `app` (POSTGRES_DB), when the data
-- volume is first created. To rerun it: docker compose down -v.
--
-- Two roles, as in production:
--   app      - what the application (and psql through pgtier) logs in as;
--   postgres - pgtier's control connection (PGTIER_CONTROL_URL): it LISTENs for
--              invalidations and installs the triggers (event triggers need a
--              superuser; without one pgtier falls back to catalog scans).

CREATE ROLE app LOGIN PASSWORD 'app';
GRANT CONNECT, TEMPORARY ON DATABASE app TO app;
GRANT USAGE, CREATE ON SCHEMA public TO app;

-- pgtier's write trigger function is SECURITY DEFINER (it runs with the control
-- role's rights), so `app` needs no grants on pgtier's own objects.

SET ROLE app;

CREATE TABLE products (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sku         text        NOT NULL UNIQUE,
    name        text        NOT NULL,
    price_cents integer     NOT NULL CHECK (price_cents >= 0),
    stock       integer     NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO products (sku, name, price_cents, stock)
SELECT 'SKU-' || lpad(i::text, 4, '0'),
       'Product ' || i,
       100 + (i * 37) % 9900,
       (i * 13) % 200
FROM generate_series(1, 1000) AS i;

RESET ROLE;

ANALYZE products;
