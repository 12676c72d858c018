# kronserve: docker build -t kronserve .                      (CPU)
#            docker build -t kronserve:cuda --build-arg TORCH=cuda .   (CUDA; run with --gpus all)
#            --build-arg EXTRAS=s3      (adapters in S3/MinIO; a Ray cluster image: deploy/Dockerfile.ray)
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

ARG TORCH=cpu
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# torch first, so the layer is reused across code changes; the CPU build comes from PyTorch's CPU index,
# the CUDA build is PyPI's default Linux wheel (it brings its CUDA libraries; the host needs only a driver).
RUN if [ "$TORCH" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    elif [ "$TORCH" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else echo "TORCH must be cpu or cuda" >&2; exit 1; fi

# Dependencies from pyproject.toml alone, so a code change reuses this layer instead of reinstalling them.
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" "${EXTRAS}" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md LICENSE ./
COPY server ./server
COPY clients ./clients
RUN pip install --no-deps .

RUN useradd --create-home --uid 1000 kronserve && mkdir -p /data && chown kronserve /data
USER kronserve
ENV KRONSERVE_HOST=0.0.0.0 \
    KRONSERVE_PORT=8000 \
    KRONSERVE_STORE=/data/adapters \
    KRONSERVE_CACHE_DIR=/data/cache \
    HF_HOME=/data/hf
VOLUME ["/data"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
CMD ["kronserve", "serve"]
