SELECT to_regclass('pgmq.meta') IS NOT NULL AS installed
