"""The MLflow experiment a user opens: marked as model training, so the UI lands on the runs table."""

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from harness import keys as K
from harness.tracking import open_store


def test_experiments_are_marked_as_model_training_new_and_old(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = open_store(OmegaConf.create({"uri": uri, "experiment": "fresh"}))
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(store.experiment_id).tags[K.TAG_EXPERIMENT_KIND] == "custom_model_development"

    old_id = client.create_experiment("written-before-the-kind-tag")
    assert K.TAG_EXPERIMENT_KIND not in client.get_experiment(old_id).tags
    store = open_store(OmegaConf.create({"uri": uri, "experiment": "written-before-the-kind-tag"}))
    assert store.experiment_id == old_id
    assert client.get_experiment(old_id).tags[K.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_ui_hint_opens_the_runs_table_without_credentials():
    from harness.tracking import Store, ui_hint

    local = ui_hint(Store("sqlite:////data/mlflow.db", "gates", "4", None))
    assert local == ("MLflow UI: mlflow ui --backend-store-uri sqlite:////data/mlflow.db, then open "
                     "http://127.0.0.1:5000/#/experiments/4?workflowType=machine_learning (the runs table)")
    remote = ui_hint(Store("https://user:secret@mlflow.example:443/", "gates", "7", None))
    assert remote.endswith("open https://mlflow.example:443/#/experiments/7?workflowType=machine_learning "
                           "(the runs table)") and "secret" not in remote
