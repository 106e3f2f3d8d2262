"""Running like SageMaker without AWS: the local-mode runner (`python -m local_mode.run`: the image under Docker, or
`serve` as a process against an /opt/ml-shaped directory), a compose file, and a SageMaker runtime emulator
(InvokeEndpoint and InvokeEndpointWithResponseStream over AWS event-stream framing) in front of a running container.
"""
