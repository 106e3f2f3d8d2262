"""Run the image locally as SageMaker does, and a local SageMaker-runtime emulator. Later issue."""
