-- The schema registry's own database (Apicurio's SQL storage), next to the pipeline's.
-- Run once by the postgres image on its first start (/docker-entrypoint-initdb.d).
CREATE DATABASE apicurio_registry;
