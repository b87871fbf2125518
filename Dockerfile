# The pipeline's image: one `streams` CLI, the stage chosen by the command
# (`streams bridge`, `streams worker`, `streams seed FILE`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY requirements.lock pyproject.toml ./
RUN pip install -r requirements.lock

COPY streams ./streams
COPY schemas ./schemas
COPY data ./data
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 streams \
    && mkdir -p /keys && chown streams /keys

USER streams
ENTRYPOINT ["streams"]
CMD ["worker"]
