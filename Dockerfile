# dipo-scale for GPU clusters: CUDA base, pinned dependencies, RDMA userspace for NCCL, non-root user.
#   docker build -t REGISTRY/dipo-scale:0.1.0 .   &&   docker push REGISTRY/dipo-scale:0.1.0
# No ENTRYPOINT: Ray launchers (KubeRay, `ray up`, `ray job submit`) run `ray start ...` and
# `python ray_jobs/...` in the container; `docker run IMAGE dipo-scale unlearn ...` works as well.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Compilers are needed at run time: DeepSpeed builds the ops it was not built with just in time.
# RDMA userspace (rdma-core, libibverbs + providers, librdmacm): without it NCCL between nodes falls
# back to TCP sockets while ZeRO-3 moves ~3 × 14 GB per GPU per step at 7B. On AWS EFA add the
# aws-ofi-nccl plugin (AWS's EFA installer) on top of this image; InfiniBand/RoCE need nothing more.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build git \
        rdma-core libibverbs1 ibverbs-providers librdmacm1 ibverbs-utils \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 dipo \
    && python3 -m venv /opt/venv \
    && chown -R dipo:dipo /opt/venv

USER 1000:1000
WORKDIR /home/dipo/app

# Pinned: the versions this project is tested with, one for every dependency of pyproject.toml
# (its ranges; tests/test_dockerfile.py checks the two lists agree). DS_BUILD_CPU_ADAM builds
# DeepSpeed's vectorised CPU Adam at install: ds_configs/zero3_offload.json steps the optimizer on
# the CPU with it (unlearn.make_optimizer), not with torch's single-threaded AdamW.
ENV DS_BUILD_CPU_ADAM=1
RUN pip install --upgrade pip==26.3 \
    && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && pip install \
        deepspeed==0.19.8 "ray[train,tune,data,default]==2.60.0" transformers==5.24.0 \
        accelerate==1.15.0 datasets==5.2.0 wandb==0.31.0 bitsandbytes==0.50.2 \
        rouge-score==0.1.2 scipy==1.17.1 scikit-learn==1.9.1 matplotlib==3.11.2 \
        pydantic==2.14.4 PyYAML==6.0.4 tqdm==4.70.1 pyarrow==26.0.1 safetensors==0.8.0 \
        tokenizers==0.23.3 optuna==5.0.0

COPY --chown=dipo:dipo pyproject.toml README.md ./
COPY --chown=dipo:dipo dipo_scale ./dipo_scale
COPY --chown=dipo:dipo ds_configs ./ds_configs
COPY --chown=dipo:dipo ray_jobs ./ray_jobs
COPY --chown=dipo:dipo configs ./configs
COPY --chown=dipo:dipo benchmarks ./benchmarks
RUN pip install --no-deps -e .

CMD ["dipo-scale", "--help"]
