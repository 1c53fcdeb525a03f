# One image for web, worker and beat; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
COPY humanconnect ./humanconnect
RUN pip install --no-cache-dir . && useradd --create-home app
USER app
EXPOSE 8000
