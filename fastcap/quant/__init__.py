"""Mixed-precision quantization for FastCap (generic over any nn.Module).

Pipeline: ``quantizable_layers`` -> ``layer_sensitivity`` / ``hessian_sensitivity`` ->
``allocate_bits`` -> (optional ``prepare_qat`` + fine-tuning) -> ``convert`` ->
``quantized_state`` / ``load_quantized``; ``format_report`` / ``plot_sensitivity`` /
``report_dict`` summarise the choice.
"""

from .allocate import allocate_bits, size_terms
from .fake import (
    SUPPORTED_BITS,
    dequantize_weight,
    fake_quant_act,
    fake_quant_weight,
    quantize_weight,
)
from .modules import (
    QATConv2d,
    QATEmbedding,
    QATLinear,
    QATMultiheadAttention,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantMultiheadAttention,
    convert,
    prepare_qat,
    strip_qat_state,
)
from .pack import load_quantized, model_size_bytes, pack_int4, quantized_state, unpack_int4
from .report import allocation_from_report, format_report, plot_sensitivity, report_dict
from .sensitivity import (
    hessian_sensitivity,
    hessian_trace,
    layer_channels,
    layer_params,
    layer_sensitivity,
    quantizable_layers,
)

__all__ = [
    "SUPPORTED_BITS",
    "QATConv2d",
    "QATEmbedding",
    "QATLinear",
    "QATMultiheadAttention",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantMultiheadAttention",
    "allocate_bits",
    "allocation_from_report",
    "convert",
    "dequantize_weight",
    "fake_quant_act",
    "fake_quant_weight",
    "format_report",
    "hessian_sensitivity",
    "hessian_trace",
    "layer_channels",
    "layer_params",
    "layer_sensitivity",
    "load_quantized",
    "model_size_bytes",
    "pack_int4",
    "plot_sensitivity",
    "prepare_qat",
    "quantize_weight",
    "quantized_state",
    "quantizable_layers",
    "report_dict",
    "size_terms",
    "strip_qat_state",
    "unpack_int4",
]
