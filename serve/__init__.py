"""HTTP layer (flask under gunicorn): TGI / OpenAI / SageMaker API shapes. Built in a later issue."""
