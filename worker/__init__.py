"""The Celery process: the app, its tasks, beat's scheduler, the broker channel, warm-up, priority.

The logic the tasks call lives in `humanconnect`, which the web shares."""
