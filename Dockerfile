# CPU image: installs the project the same way as the Makefile and runs the main job.
FROM python:3.11-slim

# make for the entry points; libGL/GLib for OpenCV (a mediapipe dependency).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md Makefile ./
COPY avatar ./avatar
COPY model ./model
COPY server ./server
COPY assets ./assets
COPY bench ./bench
RUN make install PYTHON=python3.11

# The main job: render the bundled portrait with the bundled speech into out/demo.mp4.
CMD ["make", "demo"]
