"""Audio in and out: decoding any file to float32 mono (``io.py``, with ``mp3.py`` judging an MP3 from its own
frames), resampling, writing WAV, the synthetic captioned corpus (``synth.py``) and the MP3 test corpus
(``mp3_corpus.py``)."""
