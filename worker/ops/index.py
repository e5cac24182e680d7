"""Indexing ops: GatherElements, ScatterElements, GatherND, ScatterND, CumSum, TopK, NonZero, OneHot. (being written)"""
