"""HTTP layer (flask under gunicorn): TGI / OpenAI / SageMaker API shapes over an EngineClient.

No model code here: the app talks to the one engine process through `serve.zmq_client`, or in-process
through `serve.inprocess_client`.
"""
