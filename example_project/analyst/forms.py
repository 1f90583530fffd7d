from django import forms

from analyst.market import COMPANIES


class AskForm(forms.Form):
    company = forms.ChoiceField(choices=[(name, name) for name in COMPANIES])
    question = forms.CharField(
        max_length=500,
        initial="How is the business doing, and what should an investor watch?",
        widget=forms.Textarea(attrs={"rows": 3}),
    )


class ChatForm(forms.Form):
    message = forms.CharField(max_length=2000, widget=forms.Textarea(attrs={"rows": 2}))
