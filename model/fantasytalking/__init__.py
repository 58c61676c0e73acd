"""FantasyTalking: an audio-driven video diffusion generator on Wan2.1-I2V-14B.

Specification: ../shared/specs/fantasytalking.md (section numbers below refer to it).

Network side:

* ``config``          all settings (``FantasyTalkingConfig``).
* ``audio_features``  wav2vec2 features of 16 kHz speech and the per-latent-frame
                      window splitter (section 3).
* ``audio_adapter``   ``AudioProjModel``: wav2vec2 features -> audio tokens (section 2).
* ``attention``       the ``attn2`` processor: text + image + audio (+ identity)
                      cross-attention with one shared output projection (section 4).
* ``identity``        face crop + ArcFace (insightface) and the identity Q-Former (section 6).
* ``motion``          the motion-intensity embedding added to the timestep embedding (section 6).
* ``transformer``     ``FantasyTalkingTransformer``: diffusers' Wan DiT with the above
                      installed; ``tiny_transformer`` for tests.
* ``sampler``         flow-matching sigmas, CFG combination, Euler loop (sections 5, 8).
* ``checkpoint``      the weights directory layout and its loaders (issue 4 section 2).

Generator side: ``conditioning`` (reference image, CLIP tokens, condition latent, prompt),
``vae_stream`` (streaming VAE decode, motion-frame encode), ``speed`` (the speed levers),
``tiny`` (tiny stand-in networks), ``generator`` (``FantasyTalkingGenerator``).

Importing the package imports no torch-heavy module; import the submodules.
"""
