"""reasondiff.reports"""
