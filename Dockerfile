# CPU image of the streaming avatar server: installs the project as the Makefile
# does and serves the API, the WebRTC media and the browser demo on port 8080.
#
#   docker build -t avatar-server .
#   docker run --rm -p 8080:8080 avatar-server                # a browser on this machine
#   docker run --rm --network host avatar-server              # clients on other machines
#
# WebRTC media is UDP on an ephemeral port per session (aioice has no port-range
# setting). With `-p 8080:8080` a browser on the Docker host reaches the
# container's bridge address directly. For remote clients use host networking
# and allow UDP in the host's ephemeral range (net.ipv4.ip_local_port_range,
# 32768-60999 by default); pin the announced address with
# AVATAR_ICE_HOST_ADDRESSES=<public IP of the host> when the host has several.
FROM python:3.11-slim

# make for the entry points; libGL/GLib for OpenCV (a mediapipe dependency);
# espeak-ng for the `say` message.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make libgl1 libglib2.0-0 espeak-ng \
    && rm -rf /var/lib/apt/lists/*

# constraints.txt pins torch 2.13.0: take its CPU build, not PyPI's CUDA one.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml constraints.txt README.md Makefile ./
COPY avatar ./avatar
COPY model ./model
COPY server ./server
COPY client_demo ./client_demo
COPY assets ./assets
COPY bench ./bench
COPY examples ./examples
RUN make install PYTHON=python3.11

ENV AVATAR_HOST=0.0.0.0 AVATAR_PORT=8080
EXPOSE 8080
CMD [".venv/bin/avatar-server"]
