#!/usr/bin/env bash
# Build the three wheel folders of README.md (run in the repository root; Python 3.12 x86-64 wheels).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-path info/exclude)
for d in .whlg .whlr .whls; do grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"; rm -rf "$d"; mkdir -p "$d"; done
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps $PLAT -d "$tmp" "ray==${RAY_VERSION:-2.60.0}"
( cd "$tmp" && mkdir x && cd x && unzip -q ../ray-*.whl \
  && rm -rf ray/jars ray/dashboard/client ray/rllib \
  && sed -i '/^ray\/jars\//d; /^ray\/dashboard\/client\//d; /^ray\/rllib\//d' ray-*.dist-info/RECORD \
  && zip -q -r -9 "$root/.whlr/$(basename ../ray-*.whl)" . )
rm -rf "$tmp"
python3 -m pip download -q --no-deps $PLAT -d .whlg diffusers pymatting pydantic pydantic-core annotated-types \
  typing-inspection "typing-extensions>=4.16" jsonschema jsonschema-specifications referencing rpds-py tensorboardX
# mlflow and Ray Serve's extras, less what the image has (its list: KINDS.md in the device tool's notes)
# and what the other two folders hold; grpcio-reflection matches the image's grpcio (1.84).
# lazy-importer: importlib-metadata imports it since its 2026 releases (mlflow failed to import without it).
python3 -m pip download -q --no-deps $PLAT -d .whls "mlflow==3.17.2" mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 \
  alembic sqlalchemy graphene graphql-core graphql-relay flask flask-cors gunicorn huey docker mako itsdangerous blinker \
  cachetools databricks-sdk gitpython gitdb smmap importlib-metadata opentelemetry-api opentelemetry-sdk opentelemetry-proto \
  opentelemetry-semantic-conventions opentelemetry-exporter-prometheus python-dotenv sqlparse cryptography cffi pycparser \
  google-auth pyasn1 pyasn1-modules fastapi starlette uvicorn httptools watchfiles websockets aiohttp-cors colorful \
  opencensus opencensus-context google-api-core googleapis-common-protos proto-plus smart-open py-spy mmh3 \
  "grpcio-reflection==1.84.0" prettytable wcwidth skops lazy-importer
du -sh .whlg .whlr .whls
