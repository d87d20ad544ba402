SELECT version FROM commandbus.schema_migrations WHERE to_regclass('commandbus.schema_migrations') IS NOT NULL
