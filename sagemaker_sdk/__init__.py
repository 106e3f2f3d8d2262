"""Thin deploy / invoke / monitor SDK over sagemaker 2.x and boto3. Built in a later issue."""
