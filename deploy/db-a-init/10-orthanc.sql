-- Orthanc keeps its index in its own database on country A's PostgreSQL server.
CREATE DATABASE orthanc OWNER ncp;
