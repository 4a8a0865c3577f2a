"""Durable jobs: the job store (:mod:`service.jobs.store`) and what runs on it."""
