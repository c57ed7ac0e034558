# syntax=docker/dockerfile:1
# The control plane (`meshctl serve`) and the demo apps (`python -m app.demo.apps`): one image.
# Build: docker build -t mesh .        The agent has its own, smaller image: Dockerfile.agent.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/mesh
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY mesh_agent ./mesh_agent
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
COPY examples ./examples

# Installed the way `make run` installs it (editable, without the dev extras): the console finds
# templates/, static/ and migrations/ beside app/. The same uid as the agent image, so agents
# can read the join token file the control plane writes (0600) on the shared volume.
RUN pip install -e . \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/mesh mesh \
    && mkdir -p /var/lib/mesh /run/mesh /run/mesh-seed \
    && chown mesh:mesh /var/lib/mesh /run/mesh /run/mesh-seed

USER mesh
ENV MESH_DATA_DIR=/var/lib/mesh \
    MESH_HOST=0.0.0.0 \
    MESH_PORT=8000
EXPOSE 8000
CMD ["meshctl", "serve"]
