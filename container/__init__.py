"""What SageMaker starts: the `serve` launcher (container.launcher) and the settings it reads from the environment."""
