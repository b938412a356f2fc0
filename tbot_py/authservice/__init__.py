"""authservice"""
