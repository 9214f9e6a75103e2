"""RunPod serverless worker for Resemble AI's Chatterbox TTS."""

__version__ = "0.1.0"
