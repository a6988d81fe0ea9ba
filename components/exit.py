"""The federation's exit handler on a cluster: a task that runs when the pipeline ends, however
it ends (KFP's `dsl.ExitHandler`), and closes the federation's MLflow run if the pipeline did
not succeed. A successful pipeline closes its run in its last step (`track`); without this a
run whose pipeline failed, or was cancelled, would stay RUNNING in MLflow forever. The local
runner needs none: its process closes the run itself (flminillm.runs).
"""

from kfp import dsl

from components.round_steps import DEFAULT_IMAGE


def close_run(experiment_json: str, run_started: float, status: dsl.PipelineTaskFinalStatus) -> str:
    from flminillm.invoke import close_federation_run

    return close_federation_run(
        experiment_json, run_started, status.state, status.error_message or ""
    )


def build_exit_component(image: str = DEFAULT_IMAGE):
    """`close_run` as a component in `image` (which holds flminillm)."""
    return dsl.component(close_run, base_image=image, install_kfp_package=False)
