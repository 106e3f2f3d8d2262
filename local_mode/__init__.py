"""Running like SageMaker without AWS: a local SageMaker-runtime emulator (InvokeEndpoint and
InvokeEndpointWithResponseStream over AWS event-stream framing), forwarding to a running container.
"""
