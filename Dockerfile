# One image for the API, the workers and the demo tool server (docker-compose.yml picks the command).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1
RUN pip install --no-cache-dir "uv==0.9.9"
WORKDIR /srv/sluice
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY app app
COPY agents agents
COPY schemas schemas
COPY api api
COPY bench bench
COPY config config
RUN uv sync --frozen --no-dev
ENV PATH="/srv/sluice/.venv/bin:$PATH"
ENTRYPOINT ["sluice"]
