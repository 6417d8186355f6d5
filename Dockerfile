# Multi-stage: build the wheel (needs a compiler), run it as a non-root user without one.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ext ext
COPY expserver expserver
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 expserver
USER expserver
WORKDIR /srv
EXPOSE 8080
ENTRYPOINT ["expserver"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "/srv"]
