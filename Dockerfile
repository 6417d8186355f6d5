# Multi-stage: build the wheel (needs a compiler), run it as a non-root user without one.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md MANIFEST.in ./
COPY ext ext
COPY expserver expserver
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home expserver \
    && mkdir -p /srv/www /etc/expserver
COPY deploy/expserver.json /etc/expserver/expserver.json
USER expserver
WORKDIR /srv/www
EXPOSE 8080
# a stop (docker stop, Kubernetes) drains: in-flight requests finish, then it exits
STOPSIGNAL SIGQUIT
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["expserver"]
CMD ["serve", "-c", "/etc/expserver/expserver.json"]
