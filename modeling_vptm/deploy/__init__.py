"""Deployment: publishing backbones and prompt checkpoints on the Hub with their model cards, ONNX export, and
Inference Endpoints repositories. Imported when first used (the exporter brings torch.onnx, the Hub calls
huggingface_hub's client)."""

from .. import lazy_exports


__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "hub": ("push_backbone", "push_checkpoint"),
        "model_card": ("CardInfo", "prompt_checkpoint_card"),
        "onnx_export": ("export_backbone_graph", "export_task_graph", "backbone_graph_parity", "task_graph_parity"),
        "endpoint": ("EndpointHandler", "load_endpoint", "push_endpoint_repository", "write_endpoint_repository"),
    },
)
