"""The raysys Ray Serve application and its admin, one concern per module:

    contract      the deployment's names, app args and user_config (Ray-free; shared by app and admin)
    parsing       request and feedback parsing: body -> rows -> validated arrays (pure)
    scoring       model versions and batched scoring (pure)
    web           auth, body cap, JSON responses
    monitor_link  the replica's buffer of scored rows and its link to the monitor actor
    routes        the HTTP API (FastAPI, built per replica) and the /v1/predict fast path
    endpoint      StudentEndpoint, the deployment: state, batching, rollout in place
    app           build_app (`serve.app:build_app`, serve/config.yaml) and deploy
    rollout       deploy / canary / promote / rollback through Serve's REST API
    ingress       the HAProxy ingress environment Ray is started with; free_port

Importing this package alone imports nothing (and not Ray).
"""
