# The sphinx-x node image: every Ray head and worker of a KubeRay or cluster-launcher cluster
# runs it (cluster.image). Ray 2.60 on Python 3.11 with CUDA, the pinned environment of
# cluster/requirements.txt (torch 2.13.0 CUDA build, DeepSpeed, transformers), vLLM for GPU
# serving (docker/vllm.txt), and sphinx-x itself.
#
#   docker build -t sphinx-x:0.1.0 .                     # the default cluster.image
#   docker tag sphinx-x:0.1.0 REGISTRY/sphinx-x:0.1.0 && docker push REGISTRY/sphinx-x:0.1.0
#   # then in the spec: cluster.image: REGISTRY/sphinx-x:0.1.0
#
# The install steps live in docker/install.sh, which CI runs in a fresh virtualenv
# (tests/docker/test_install.py) so a broken line fails there, not at the next image build.
FROM rayproject/ray:2.60.0-py311-gpu

# A C++ compiler: DeepSpeed JIT-builds small ops on first use (cached under ~/.cache/torch_extensions).
# tesseract-ocr (with its English data): `curate.ocr.engine: tesseract` for pages without a text layer.
RUN sudo apt-get update \
 && sudo apt-get install -y --no-install-recommends g++ tesseract-ocr \
 && sudo rm -rf /var/lib/apt/lists/*

WORKDIR /home/ray/sphinx-x
COPY --chown=ray:users . .
RUN bash docker/install.sh

# Ray Jobs get the project as their working directory anyway (`sphinx-x run --address`); the
# installed copy serves RayJob / RayService entrypoints that run from any directory.
WORKDIR /home/ray
