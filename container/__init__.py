"""What SageMaker starts: the `serve` launcher, settings from the environment. Built in a later issue."""
