-- One Postgres for both servers: MLflow's tracking store and Prefect's database.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
